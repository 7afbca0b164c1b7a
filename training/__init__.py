"""Offline half of the product: train a VAE on Fashion-MNIST or MNIST and export it as ONNX for `service`.

Read the modules in order: `config` (every setting, one flag each) -> `data` (IDX files, download, splits)
-> `model` (encoder, reparameterization, decoder) -> `objectives` (ELBO, KL, IWAE) -> `checkpoints` (save,
resume, load) -> `train` (the loop, torchrun) -> `evaluate` (test-set figures) -> `figures` (samples,
reconstructions, curves) -> `export` (ONNX, parity check, manifest) -> `cli`.
"""
