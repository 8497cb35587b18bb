import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="session")
def sd1():
    from unets import sd1_unet

    return sd1_unet()


@pytest.fixture(scope="session")
def sd2():
    from unets import sd2_unet

    return sd2_unet()


@pytest.fixture(scope="session")
def sdxl_like():
    from unets import sdxl_like_unet

    return sdxl_like_unet()
