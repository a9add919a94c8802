from subspace_cli.cli.app import main

main()
