from batchserve.bench.cli import main

main()
