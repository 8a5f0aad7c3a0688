from zstack_operator.cli import main

main()
