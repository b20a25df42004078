"""Ollama's Modelfile parser (ollama/ollama, parser/parser.go `ParseFile` and `parseRuneForState`), ported rune for
rune so that tests read our Modelfiles exactly as `ollama create` does. In short: a directive name, a space, then a
value that ends at the first newline after which the text so far unquotes ("...", \"\"\"...\"\"\", or a bare word);
there are no escape sequences; characters that are not printable are dropped, except newlines inside a quoted
value; `#` starts a comment line."""

from __future__ import annotations

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message",
            "requires"}  # fmt: skip


def unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _is_print(r: str) -> bool:
    return r == " " or r.isprintable()


def _next(r: str, state: str) -> tuple[str, str]:
    """parseRuneForState: the next state, and the rune to keep ("" for none)."""
    newline, space = r in "\r\n", r in " \t"
    if state == "nil":
        return ("comment", "") if r == "#" else ("nil", "") if space or newline else ("name", r)
    if state == "name":
        if r.isascii() and r.isalpha():
            return "name", r
        if space:
            return "value", ""
        raise ValueError("command must be one of ...")
    if state == "value":
        return ("nil", r) if newline or space else ("value", r)
    if state in ("parameter", "message"):
        if r.isascii() and (r.isalnum() or (r == "_" and state == "parameter")):
            return state, r
        if space:
            return "value", ""
        raise ValueError("unexpected end of file")
    return ("nil", "") if newline else ("comment", "")


def parse(text: str) -> list[tuple[str, str]]:
    """[(name, value)]: `model` for FROM, the parameter's own name for PARAMETER; ValueError where Ollama errs."""
    commands, state, buffer, name, role = [], "nil", "", "", ""
    for r in text:
        nxt, keep = _next(r, state)
        if nxt != state:
            if state == "name":
                if buffer.lower() not in COMMANDS:
                    raise ValueError(f"invalid command {buffer!r}")
                name = "model" if buffer.lower() == "from" else buffer.lower()
                nxt = {"parameter": "parameter", "message": "message"}.get(name, nxt)
            elif state == "parameter":
                name = buffer
            elif state == "message":
                role = buffer
            elif state == "value":
                value, ok = unquote(buffer.strip())
                if not ok or keep in (" ", "\t"):
                    buffer += keep
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buffer, state = "", nxt
        if keep and _is_print(keep):
            buffer += keep
    if state == "value":
        value, ok = unquote(buffer.strip())
        if not ok:
            raise ValueError("unexpected end of file in a quoted value")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    if not any(n == "model" for n, _ in commands):
        raise ValueError("no FROM line")
    return commands
