"""`python -m nt chat MODEL` / `python -m nt complete MODEL --prompt ...` (see nt.chat)."""
import sys

from .chat import main

if __name__ == "__main__":
    sys.exit(main())
