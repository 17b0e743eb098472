"""benchmarks/profile.py's arithmetic: self samples turned into CPU per request, and the growth
table the `backends` scenario prints (the profiling itself needs py-spy and a load: run by hand)."""

from benchmarks.profile import growth_table, per_request

# As py-spy writes them (`--format raw`), line numbers already stripped (main() does that):
# the standard library by its absolute path, the rest relative to where it runs.
SMALL = """run (/usr/lib/python3.11/asyncio/runners.py);write (stickyproxy/outbox.py) 60
run (/usr/lib/python3.11/asyncio/runners.py);answered (stickyproxy/proxy.py) 20
run (/usr/lib/python3.11/asyncio/runners.py) 20
"""
LARGE = """run (/usr/lib/python3.11/asyncio/runners.py);write (stickyproxy/outbox.py) 50
run (/usr/lib/python3.11/asyncio/runners.py);answered (stickyproxy/proxy.py) 30
run (/usr/lib/python3.11/asyncio/runners.py) 20
"""


def test_self_time_is_the_share_of_samples_times_the_cpu_per_request():
    small = per_request(SMALL, 20.0)
    assert small == {"write (stickyproxy/outbox.py)": 12.0, "answered (stickyproxy/proxy.py)": 4.0,
                     "run (runners.py)": 4.0}
    assert per_request("", 20.0) == {}


def test_the_growth_table_ranks_functions_by_their_growth_and_sums_the_rest():
    small, large = per_request(SMALL, 20.0), per_request(LARGE, 30.0)  # 12,4,4 -> 15,9,6
    lines = growth_table(small, large, ("4", "1,000"), top=2).splitlines()
    assert lines[1].split() == ["+5.00", "4.00", "9.00", "answered", "(stickyproxy/proxy.py)"]
    assert lines[2].split() == ["+3.00", "12.00", "15.00", "write", "(stickyproxy/outbox.py)"]
    assert lines[3].split()[0] == "+2.00" and "all the others" in lines[3]
