import sys

try:  # Ctrl-C while the CLI itself is imported: one line too (main() covers everything after)
    from .cli import main
except KeyboardInterrupt:
    print("mvquant: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
