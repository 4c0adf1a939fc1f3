from ioi.cli import console_main

console_main()
