from clipkit.cli.main import cli

cli(prog_name="clipkit")
