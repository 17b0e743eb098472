"""stickyproxy: one WebDriver address in front of a pool of PhantomJS (or other WebDriver)
servers, keeping every session on the server that created it."""

__version__ = "0.1.0"
