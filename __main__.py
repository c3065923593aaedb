from dclsify.cli import main

main()
