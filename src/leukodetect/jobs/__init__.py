"""The top layer: the workflows a command runs. They orchestrate the library; they hold no maths.

See docs/architecture.md.
"""
