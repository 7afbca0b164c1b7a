"""`python -m service_ray`: see service_ray/launch.py."""

from service_ray.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
