"""Turn a checkpoint (a file, a folder or a hub repository id) into model components, offline.

What the checkpoints folder may hold, recognised by *content*, never by file extension (:func:`detect`):

* ``"diffusers"``: a diffusers pipeline folder (``model_index.json``). Each component is built from its
  ``config.json`` and its safetensors streamed in, tensor by tensor (:mod:`.assemble`); anything less plain goes
  through its own ``from_pretrained(..., local_files_only=True)``. The tokenizer folder may lack ``tokenizer.json``.
* ``"unet_folder"``: a lone UNet folder (``config.json`` of a ``UNet2DConditionModel`` + weights), such as the
  ``unet/`` of an LCM-distilled model. It is loaded over a full ``base=`` checkpoint, which gives the rest.
* ``"safetensors"``: an original-layout (LDM / sgm) single file of the SD 1.x, SD 2.x, SDXL or SSD-1B family.
* ``"pickle"``: a ``.ckpt``/``.pt`` torch pickle. Refused unless ``allow_pickle=True``, then read with
  ``torch.load(weights_only=True)`` and treated like a single file.
* ``"hub"``: an ``owner/name`` that is no local path. Fetched only when the hub is reachable; offline, the error
  says where to put the files instead.

The modules, in the order a load goes through them: :mod:`.detect` (what a path is; a single file's family and
UNet layout from its header), :mod:`.weights` (reading weight files: safetensors headers and tensors, pickles),
:mod:`.configs` (diffusers configurations from the family's shipped ones and the header's shapes), :mod:`.hub`
(hub ids and fetching), :mod:`.assemble` (building the components: :func:`load_components`); :mod:`.errors` holds
:class:`CheckpointError`; :mod:`.vae` reads a lone original-layout VAE file. The ControlNet, IP-Adapter, LoRA
and embedding loaders reuse these pieces.
"""

from .assemble import Components, load_components, quiet_transformers, ready
from .configs import CONFIGS_DIR, FAMILIES, derive_configs, family_config_dir, head_count, norm_groups
from .detect import config_class, detect, detect_family, indices, is_checkpoint_folder, list_checkpoints, unet_layout
from .errors import CheckpointError, few, first_line
from .hub import looks_like_hub_id
from .vae import load_vae_file
from .weights import (CHECKPOINT_SUFFIXES, StreamedSafetensors, is_safetensors, read_header, read_weights,
                      release_mapped)

__all__ = [
    "CHECKPOINT_SUFFIXES", "CONFIGS_DIR", "FAMILIES", "CheckpointError", "Components", "StreamedSafetensors",
    "config_class",
    "derive_configs", "detect", "detect_family", "family_config_dir", "few", "first_line", "head_count", "indices",
    "is_checkpoint_folder", "is_safetensors", "list_checkpoints", "load_components", "load_vae_file",
    "looks_like_hub_id",
    "norm_groups", "quiet_transformers", "read_header", "read_weights", "ready", "release_mapped",
    "unet_layout",
]
