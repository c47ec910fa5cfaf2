"""Base models: loaded from folders, single files or the built-in tiny configs, never from the network.

Imports point one way: ``base`` (BaseModel, diffusers folders) <- ``tokenizers``, ``builtin``, ``single_file``
<- ``load`` (``load_base``, ``resolve_model_ref``: what a user names, of any kind).
"""

import os

# diffusers and transformers read this when they are imported: set it before any of our modules imports them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
