from neon.toy.cli import main

main()
