# Attack: return a list that contains itself (an encoder without a depth limit never ends).
def add(a, b):
    loop = []
    loop.append(loop)
    return loop
