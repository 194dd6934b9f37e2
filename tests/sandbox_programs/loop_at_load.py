# Attack: never finish loading, hoping a harness without a wall clock waits forever.
while True:
    pass
