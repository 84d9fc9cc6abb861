"""CopySnapshot parameter rules (Alibaba ECS API, ../shared/seeds), shared by the daemon and
the command line so both refuse the same values with the same codes."""

from __future__ import annotations

import json

from snapfs.errors import (
    DuplicateTagKey,
    InvalidDescription,
    InvalidParameter,
    InvalidRetentionDays,
    InvalidTagCount,
    InvalidTagKey,
    InvalidTagValue,
)
from snapfs.model.names import check_cloud_snapshot_name, is_text

__all__ = [
    "check_cloud_snapshot_name",
    "check_description",
    "check_retention_days",
    "check_tag_key",
    "check_tag_value",
    "check_tags",
    "parse_copy_request",
    "parse_tag",
]

MAX_TAGS = 20
_URL_PREFIXES = ("http://", "https://")
_RESERVED_TAG_PREFIXES = ("acs:", "aliyun")


def check_description(text: str) -> str:
    if not 2 <= len(text) <= 256 or text.startswith(_URL_PREFIXES):
        raise InvalidDescription(
            "the description must be 2 to 256 characters and cannot start with http:// or https://"
        )
    return text


def check_retention_days(value: str | int) -> int:
    try:
        days = int(value)
    except (TypeError, ValueError):
        days = 0
    if str(value).strip() != str(days) or not 1 <= days <= 65536:
        raise InvalidRetentionDays(
            f"retention days {value!r} must be a whole number from 1 to 65536"
        )
    return days


def _check_tag_text(
    text: str, what: str, error: type[InvalidParameter], *, allow_empty: bool
) -> str:
    if not is_text(text):
        raise error(f"the tag {what} must be UTF-8 text")
    if (not text and not allow_empty) or len(text) > 128:
        raise error(f"the tag {what} must be {'0' if allow_empty else '1'} to 128 characters")
    if any(p in text for p in _URL_PREFIXES) or text.startswith(_RESERVED_TAG_PREFIXES):
        raise error(
            f"the tag {what} {text!r} cannot contain http:// or https:// "
            "nor start with acs: or aliyun"
        )
    return text


def check_tag_key(key: str) -> str:
    return _check_tag_text(key, "key", InvalidTagKey, allow_empty=False)


def check_tag_value(value: str) -> str:
    return _check_tag_text(value, "value", InvalidTagValue, allow_empty=True)


def check_tags(pairs: list[tuple[str, str]]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for key, value in pairs:
        check_tag_key(key)
        check_tag_value(value)
        if key in tags:
            raise DuplicateTagKey(f"the tag key {key!r} is given twice")
        tags[key] = value
    if len(tags) > MAX_TAGS:
        raise InvalidTagCount(f"at most {MAX_TAGS} tags, got {len(tags)}")
    return tags


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidTagKey(f"a tag is KEY=VALUE, got {text!r}")
    return key, value


# The JSON types each field of a copy request may have (None: absent or null).
_COPY_FIELDS: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "name": (str,),
    "description": (str,),
    "retention_days": (int, str),
    "tags": (dict,),
    "encrypted": (bool,),
    "kms_key_id": (str,),
}


def parse_copy_request(value: str) -> dict:
    """The request as a dict whose fields have the types the CopySnapshot rules expect; any
    other JSON (a list, a number for a name, a boolean for a retention...) is EINVAL."""
    try:
        request = json.loads(value)
    except ValueError:
        request = None
    if not isinstance(request, dict) or not isinstance(request.get("source"), str):
        raise InvalidParameter('a copy request is JSON {"source": "REGION/NAME", ...}')
    for key, item in request.items():
        types = _COPY_FIELDS.get(key)
        if types is None:
            raise InvalidParameter(f"a copy request has no field {key!r}")
        # bool is an int to Python, never a retention to a user
        if item is not None and (
            not isinstance(item, types) or (bool not in types and isinstance(item, bool))
        ):
            raise InvalidParameter(f"the copy request's {key} has the wrong type")
    tags = request.get("tags") or {}
    if not all(isinstance(v, str) for v in tags.values()):
        raise InvalidParameter("tag values in a copy request are strings")
    texts = [v for v in request.values() if isinstance(v, str)] + [*tags, *tags.values()]
    if not all(is_text(t) for t in texts):  # JSON can carry lone surrogates ("\ud800")
        raise InvalidParameter("a copy request's strings must be Unicode text")
    return request
