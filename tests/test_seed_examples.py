"""The examples of the original parfor README run unchanged, as scripts, with the same output.

Each example is copied verbatim between a preamble (what the README assumes is already there)
and nothing else; all run at once in their own interpreters, since each sleeps 10 x 1 s.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

EXPECTED = "[0, 3, 12, 27, 48, 75, 108, 147, 192, 243]"

EXAMPLES = {
    "decorator": ("", """
        from time import sleep
        from parfor import parfor
        @parfor(range(10), (3,))
        def fun(i, a):
            sleep(1)
            return a * i ** 2
        print(fun)
    """, "", EXPECTED),
    "decorator-without-bar": ("from time import sleep\nfrom parfor import parfor\n", """
        @parfor(range(10), (3,), bar=False)
        def fun(i, a):
            sleep(1)
            return a * i ** 2
        print(fun)
    """, "", EXPECTED),
    "main-guard": ("", """
        from time import sleep
        from parfor import parfor

        if __name__ == '__main__':
            @parfor(range(10), (3,))
            def fun(i, a):
                sleep(1)
                return a * i ** 2
            print(fun)
    """, "", EXPECTED),
    "inside-a-function": ("", """
        from time import sleep
        from parfor import parfor

        def my_fun(*args, **kwargs):
            @parfor(range(10), (3,))
            def fun(i, a):
                sleep(1)
                return a * i ** 2
            return fun

        if __name__ == '__main__':
            print(my_fun())
    """, "", EXPECTED),
    "pmap": ("", """
        from parfor import pmap
        from time import sleep
        def fun(i, a):
            sleep(1)
            return a * i ** 2
        print(pmap(fun, range(10), (3,)))
    """, "", EXPECTED),
    "generator": (
        "import numpy as np\nfrom parfor import parfor\n"
        "imagereader = [np.full((4, 4), float(i)) for i in range(7)]\n",
        """
        import numpy as np
        c = (im for im in imagereader)
        @parfor(c, total=len(imagereader))
        def fun(im):
            return np.mean(im)
        """,
        "print([float(m) for m in fun])\n",
        "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]",
    ),
}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.Popen]:
    folder = tmp_path_factory.mktemp("seed")
    processes = {}
    for name, (preamble, example, postamble, _) in EXAMPLES.items():
        script = folder / f"{name}.py"
        script.write_text(preamble + textwrap.dedent(example) + postamble)
        processes[name] = subprocess.Popen([sys.executable, str(script)], cwd=folder,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
    yield processes
    for process in processes.values():  # also those a -k left out: their pipes closed too
        process.kill()
        process.communicate()


@pytest.mark.parametrize("name", EXAMPLES)
def test_seed_example_prints_the_documented_result(running, name):
    out, err = running[name].communicate(timeout=90)
    assert running[name].returncode == 0, err
    assert out.strip().splitlines()[-1] == EXAMPLES[name][3]
    if "bar=False" in EXAMPLES[name][1]:
        assert "it/s" not in err
    else:
        assert "10/10" in err or "7/7" in err  # the progress bar ran to the end
