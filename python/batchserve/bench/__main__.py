from batchserve.bench import main

main()
