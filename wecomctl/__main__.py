from wecomctl.cli import main

main()
