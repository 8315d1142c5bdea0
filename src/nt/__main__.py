"""`python -m nt chat MODEL` / `python -m nt complete MODEL --prompt ...` (see nt.chat) and
`python -m nt export RUN_OR_CHECKPOINT OUT [--to gguf|hf] [--type Q8_0]` (see nt.export)."""
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Dispatch on the command: export has its own parser, chat and complete share nt.chat's."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from .export import main as export_main
        return export_main(argv[1:])
    from .chat import main as chat_main
    return chat_main(argv)


if __name__ == "__main__":
    sys.exit(main())
