from leukodetect.cli import main

main()
