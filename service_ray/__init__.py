"""The service on Ray Serve: the same app (`service.app.create_app`) as N replicas behind Ray's ingress.

`deployment` is the Ray Serve deployment (`import_path: service_ray.deployment:app` in
deploy/ray/serve.yaml); `launch` is `python -m service_ray` (`./run serve-ray`), a local Ray instance serving
that config file. Ray is the optional `ray` extra: `service` never imports this package or Ray.
"""
