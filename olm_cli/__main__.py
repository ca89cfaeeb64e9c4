from olm_cli.cli import main

main()
