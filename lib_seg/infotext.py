"""Reading SEG settings back from infotext (webui "paste" / "send to")."""

from __future__ import annotations

from collections.abc import MutableMapping

from .params import INFOTEXT_KEYS, SEGParams
from .ui_spec import CONTROLS

ENABLED_KEY = "SEG enabled"


def enabled_from_infotext(params: MutableMapping[str, object]) -> bool:
    """SEG is on exactly when the infotext carries ``SEG scale`` (as found before
    ``fill_absent_keys`` gave absent keys their defaults)."""
    if ENABLED_KEY in params:
        return str(params[ENABLED_KEY]) == "True"
    return INFOTEXT_KEYS["scale"] in params


def fill_absent_keys(params: MutableMapping[str, object]) -> None:
    """Give every SEG key absent from a pasted infotext its default, so pasting restores every
    control (the webui leaves a control unchanged for an absent key), ``SEG scale`` included. Its
    presence is what turns SEG on, so that is recorded first, under ``SEG enabled``."""
    params.setdefault(ENABLED_KEY, str(INFOTEXT_KEYS["scale"] in params))
    defaults = SEGParams()
    for control in CONTROLS:
        key = control.infotext_key
        if key is None or key in params:
            continue
        params[key] = str(control.default(defaults))


class InfotextFlag(str):
    """The enable flag's infotext field: a name *and* a reader.

    The webui copies "send to" fields by name (a string in ``paste_field_names``) but reads a
    callable field by calling it, on both the UI paste and the API ``infotext`` paths. The flag
    needs both: it is carried by "send to", and on paste it is on exactly when ``SEG scale`` is
    present (a plain key would leave it unchanged when absent).
    """

    def __call__(self, params: MutableMapping[str, object]) -> bool:
        return enabled_from_infotext(params)


ENABLED_FIELD = InfotextFlag(ENABLED_KEY)


def paste_field_names() -> list[str]:
    """Field names "send to" copies: the flag and every infotext key."""
    return [str(ENABLED_FIELD), *INFOTEXT_KEYS.values()]
