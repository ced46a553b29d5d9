from mass_nnu.cli import main

main()
