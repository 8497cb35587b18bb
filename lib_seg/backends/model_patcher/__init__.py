"""SEG on a ComfyUI-lineage model patcher: Forge (``backend/``), reForge and Forge Classic
(``ldm_patched``) and ComfyUI itself all sample through a cloneable patcher whose model options
carry post-CFG functions, a model-call wrapper and attention patches.

- ``guidance``: what every host shares: the post-CFG function adding the SEG term, the functions
  SEG puts on a cloned patcher, the separate evaluation of the smoothed branch.
- ``shared_batch``: SEG's smoothed rows inside the host's own batched model calls;
  ``prefix_sharing``: the blocks before the first smoothed one shared with their source rows.
- ``compiled``: keeps SEG's rows out of a ``torch.compile`` d model call.
- One small adapter per host, each giving ``guidance.HostFunctions`` (evaluator, attention,
  memory test, where its UNet runs its blocks) and, for transformers, where their attention
  kernel is hooked: ``forge`` (Forge and Forge Neo), ``ldm_patched`` (reForge, Forge Classic),
  ``comfyui`` (ComfyUI). An adapter imports its host's modules only when called.
"""
