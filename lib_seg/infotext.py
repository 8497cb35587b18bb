"""Reading SEG settings back from infotext (webui "paste", "send to" and the API's ``infotext``).

Every SEG field is a name *and* a reader. The webui copies "send to" fields by name (a string in
``paste_field_names``) but reads a callable field by calling it, on the UI paste, PNG-info and
API ``infotext`` paths alike. A plain key would leave its control unchanged when the infotext
lacks it; the readers return the default instead, so pasting restores every control, and the
parsed parameters themselves stay as the image wrote them (PNG info shows no SEG keys for an image
made without SEG).
"""

from __future__ import annotations

from collections.abc import Mapping

from .params import INFOTEXT_KEYS, SEGParams
from .ui_spec import CONTROLS

ENABLED_KEY = "SEG enabled"


def enabled_from_infotext(params: Mapping[str, object]) -> bool:
    """SEG is on exactly when the infotext carries ``SEG scale``."""
    return INFOTEXT_KEYS["scale"] in params


class InfotextField(str):
    """A SEG infotext key whose reader gives ``default`` (as infotext text) when it is absent."""

    default: str

    def __new__(cls, key: str, default: str = ""):
        field = super().__new__(cls, key)
        field.default = default
        return field

    def __call__(self, params: Mapping[str, object]) -> object:
        return params.get(str(self), self.default)


class InfotextFlag(InfotextField):
    """The enable flag: on exactly when ``SEG scale`` is present."""

    def __call__(self, params: Mapping[str, object]) -> bool:
        return enabled_from_infotext(params)


ENABLED_FIELD = InfotextFlag(ENABLED_KEY)


def value_fields() -> list[InfotextField]:
    """The fields of the value controls, in UI order, each defaulting to the built-in default."""
    defaults = SEGParams()
    return [
        InfotextField(control.infotext_key, str(control.default(defaults)))
        for control in CONTROLS
        if control.infotext_key is not None
    ]


def paste_field_names() -> list[str]:
    """Field names "send to" copies: the flag and every infotext key."""
    return [str(ENABLED_FIELD), *INFOTEXT_KEYS.values()]
