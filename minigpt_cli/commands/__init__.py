"""One module per `minigpt` command: its options, one library call, the rendering of the result.

cli.py builds the app from these; each module imports torch only inside its command.
"""
