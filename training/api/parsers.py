"""The API's JSON parser: DRF's, refusing what would otherwise fail deep inside a view.

Python's json module recurses once per nesting level, so a body of a few kilobytes of
brackets raises RecursionError (a 500); and it accepts escaped lone surrogates ("\\ud800"),
strings that no database or UTF-8 encoder takes. Both are refused here with a 400 that
says what to fix, on every endpoint at once (the DEFAULT_PARSER_CLASSES setting).
"""

import codecs
import json

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils.json import strict_constant


class StrictJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        max_depth = settings.FEDLENS_MAX_JSON_DEPTH
        try:
            text = codecs.getreader(encoding)(stream).read()
            data = json.loads(text, parse_constant=strict_constant if self.strict else None)
        except RecursionError:
            raise ParseError(too_deep(max_depth)) from None
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None
        check_json_tree(data, max_depth)
        return data


def too_deep(max_depth: int) -> str:
    return (
        f"JSON parse error - the body is nested more than {max_depth} levels deep "
        "(FEDLENS_MAX_JSON_DEPTH); send a flatter document."
    )


def check_json_tree(data, max_depth: int) -> None:
    """Refuse nesting beyond max_depth levels and strings holding lone surrogates.

    Iterative, so that checking does not recurse either.
    """
    pending = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            check_string(value)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > max_depth:
            raise ParseError(too_deep(max_depth))
        if isinstance(value, dict):
            for key, item in value.items():
                check_string(key)
                pending.append((item, depth + 1))
        else:
            pending.extend((item, depth + 1) for item in value)


def check_string(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        surrogate = value[exc.start]
        raise ParseError(
            f"JSON parse error - a string holds the lone surrogate \\u{ord(surrogate):04x}, "
            "half of a character: send valid UTF-8 text (escape characters beyond U+FFFF as "
            "a surrogate pair, or not at all)."
        ) from None
