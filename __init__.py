"""ComfyUI loads this folder as a custom-node package (the webuis never import it: they load
``scripts/``). Loaded as a plain file, as pytest's collection does for the folder it runs in, it
defines no node."""

if __package__:
    from .comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
