from vicuna_sky.train.cli import main

main()
