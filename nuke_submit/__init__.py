"""Everything that runs inside Nuke, and the submission client it shares with the CLI.

Keep imports here light: Nuke's own Python imports this package.
"""
