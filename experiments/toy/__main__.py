from experiments.toy.cli import main

main()
