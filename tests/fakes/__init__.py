"""Stand-ins of the UI programs the extensions plug into (A1111, Forge, ComfyUI), for offline CI.

They prove nothing about the real tools; tests/test_ext_*_real.py run the extensions against the
real code when an environment variable points at a checkout.
"""
