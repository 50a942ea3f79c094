from neon.cli import main

main()
