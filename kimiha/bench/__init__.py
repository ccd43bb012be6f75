"""The benchmark tooling behind ``python -m kimiha bench``: ``main`` (the modes, the machine header),
``compare`` (throughput side by side with a direct call, asyncio.Queue, pyee and NautilusTrader), ``latency``
(paced publish -> handler percentiles), ``memory`` (RSS over millions of events), ``cases`` and ``runner``
(the shared case builders and the interleaved-repetition runner), ``anchors`` (the other libraries).

Nothing in the framework imports it: ``import kimiha`` never loads benchmark code.
"""
