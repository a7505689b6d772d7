"""A PyAV container stand-in for tests that watch what the code under test does with a file: it
passes everything to the real container, and a subclass overrides the call it watches."""


class Container:
    def __init__(self, c):
        self.c = c

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.c.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.c, name)
