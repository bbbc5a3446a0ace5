from mlfarm.cli import main

main()
