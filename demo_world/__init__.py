"""The demo world: procedural 64x64 "shapes" images (``shapes``) and a tiny SD-shaped base model
trained on them (``base_model``; built by ``tools/make_demo_assets.py``)."""
