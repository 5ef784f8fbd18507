#!/usr/bin/env python3
"""Prints the code block that follows `<!-- snippet: NAME -->` in README.md, exactly as written.

    scripts/lib/readme_snippet.py NAME [README]

The test command compiles or runs these blocks (the Swift and Kotlin adopter snippets in the binding
suites, the Python example in the wheel's fresh virtual environment), so the README cannot show code
that does not work. Exits 1 if the marker, or a fenced block right after it, is missing.
"""

import sys


def snippet(text, name):
    lines = text.splitlines(keepends=True)
    marker = "<!-- snippet: %s " % name
    for i, line in enumerate(lines):
        if line.startswith(marker) or line.strip() == "<!-- snippet: %s -->" % name:
            rest = iter(lines[i + 1 :])
            fence = next(rest, "")
            if not fence.startswith("```"):
                raise SystemExit("readme_snippet: no fenced block right after the %r marker" % name)
            body = []
            for code in rest:
                if code.startswith("```"):
                    return "".join(body)
                body.append(code)
            raise SystemExit("readme_snippet: the %r block is not closed" % name)
    raise SystemExit("readme_snippet: no `<!-- snippet: %s -->` marker" % name)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: readme_snippet.py NAME [README]")
    path = sys.argv[2] if len(sys.argv) == 3 else "README.md"
    with open(path, encoding="utf-8") as f:
        sys.stdout.write(snippet(f.read(), sys.argv[1]))
