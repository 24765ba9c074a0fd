from kiln.cli import entry

entry()
