"""Rewinding a run's metric history to the checkpoint a resumed run starts from.

Metrics reach the store ahead of the checkpoint that covers them (the trainer flushes before each
save, the background thread at any time), so a killed run's history can run past its newest
committed checkpoint. The resumed run replays those steps and logs them again; without a rewind
the store would hold two rows per replayed step. MLflow has no API to delete metric values, so
this works on the sqlite store's own tables (through MLflow's models of them).
"""

from __future__ import annotations


def drop_metrics_after(uri: str, run_id: str, step: int) -> int:
    """Delete `run_id`'s metric values logged at steps after `step` from the sqlite store `uri`,
    and point each affected latest-metric entry back at its newest remaining value.
    Returns the number of values deleted."""
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
    from sqlalchemy.orm import Session

    engine = sa.create_engine(uri, connect_args={"timeout": 20})  # wait on a busy store
    try:
        with Session(engine) as session, session.begin():
            later = session.query(SqlMetric).filter(
                SqlMetric.run_uuid == run_id, SqlMetric.step > step
            )
            keys = {key for (key,) in later.with_entities(SqlMetric.key).distinct()}
            if not keys:
                return 0
            deleted = later.delete(synchronize_session=False)
            session.query(SqlLatestMetric).filter(
                SqlLatestMetric.run_uuid == run_id, SqlLatestMetric.key.in_(keys)
            ).delete(synchronize_session=False)
            for key in keys:
                # MLflow's "latest" is the greatest (step, timestamp, value).
                newest = (
                    session.query(SqlMetric)
                    .filter(SqlMetric.run_uuid == run_id, SqlMetric.key == key)
                    .order_by(SqlMetric.step.desc(), SqlMetric.timestamp.desc(),
                              SqlMetric.value.desc())
                    .first()
                )
                if newest is not None:
                    session.add(SqlLatestMetric(
                        key=key, value=newest.value, timestamp=newest.timestamp,
                        step=newest.step, is_nan=newest.is_nan, run_uuid=run_id,
                    ))
            return int(deleted)
    finally:
        engine.dispose()
