"""The uqserve version: a bottom module, so that any layer can name it.

``uqserve.__version__`` re-exports it; modules inside the package import it
from here (importing the package root would pull in its public API).
"""

__version__ = "0.1.0"
