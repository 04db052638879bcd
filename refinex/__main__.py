"""``python -m refinex``: the ``refinex`` command."""
from refinex.cli import main

if __name__ == "__main__":
    main()
