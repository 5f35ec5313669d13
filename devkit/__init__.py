"""Development kit shared by tests/, bench/ and scripts/: the pack loader, error metrics,
realistic attention inputs and the real-ComfyUI harness with its tiny models and test nodes.

Not part of the shipped node pack: ComfyUI imports only the repository root's __init__.py,
which never imports devkit. Callers put the repository root on sys.path and import
``devkit.<module>``."""
