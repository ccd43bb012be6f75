"""The scheduler's parts, each a small unit of its own behind :class:`kimiha.scheduler.Scheduler`.

* ``registry``    -- task and scheduler states, each task's entry and counters, the registry table.
* ``supervision`` -- the failure policies (``OnError``, ``Supervision``) and the ``Supervisor`` applying them.
* ``shutdown``    -- the stop sequence, ordered by the data flow (producers, staged drains, background readers,
  pumps, hooks), within one deadline; also the rollback of a start that failed or was interrupted.
* ``signals``     -- taking SIGINT / SIGTERM for a run and giving the host its handlers back.
"""
