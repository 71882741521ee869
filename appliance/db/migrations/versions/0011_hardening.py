"""hardening: volume attachment claims, login throttles, the append-only audit log

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 13:12:03
"""

import json

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None
# Additive (new tables, a nullable column): code that carries 0010 runs on it, though a
# member one release behind neither claims attachments nor writes the audit log.
compatible_with = '0010'

APPEND_ONLY = "the audit log is append-only: records are never changed"


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('user_name', sa.String(length=63), nullable=True),
    sa.Column('via', sa.String(length=16), nullable=True),
    sa.Column('source', sa.String(length=64), nullable=True),
    sa.Column('method', sa.String(length=8), nullable=False),
    sa.Column('path', sa.String(length=512), nullable=False),
    sa.Column('action', sa.String(length=128), nullable=False),
    sa.Column('object_kind', sa.String(length=32), nullable=True),
    sa.Column('object_name', sa.String(length=128), nullable=True),
    sa.Column('project', sa.String(length=63), nullable=True),
    sa.Column('status', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_log_time', ['time', 'seq'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_log_user_name'), ['user_name'], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION cairn_audit_append_only() RETURNS trigger AS $$
            BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$ LANGUAGE plpgsql""")
        op.execute("CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log "
                   "FOR EACH ROW EXECUTE FUNCTION cairn_audit_append_only()")
    else:
        op.execute(f"CREATE TRIGGER audit_log_append_only BEFORE UPDATE ON audit_log "
                   f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END")

    op.create_table('login_throttles',
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('window_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('locked_until', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('volumes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instance_id', sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f('ix_volumes_instance_id'), ['instance_id'], unique=False)
        batch_op.create_foreign_key('fk_volumes_instance_id', 'instances', ['instance_id'], ['id'],
                                    ondelete='SET NULL')
    _backfill_attachments()


def _backfill_attachments() -> None:
    """Instances listed their volumes only in spec.volumes: record the claims."""
    bind = op.get_bind()
    rows = bind.execute(sa.text("SELECT id, project_id, spec FROM instances")).all()
    for iid, project_id, spec in rows:
        if isinstance(spec, str):
            spec = json.loads(spec)
        for name in (spec or {}).get("volumes") or []:
            bind.execute(sa.text("UPDATE volumes SET instance_id = :iid WHERE project_id = :p AND name = :n "
                                 "AND instance_id IS NULL"), {"iid": iid, "p": project_id, "n": name})


def downgrade() -> None:
    with op.batch_alter_table('volumes', schema=None) as batch_op:
        batch_op.drop_constraint('fk_volumes_instance_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_volumes_instance_id'))
        batch_op.drop_column('instance_id')

    op.drop_table('login_throttles')
    op.execute("DROP TRIGGER IF EXISTS audit_log_append_only" +
               (" ON audit_log" if op.get_bind().dialect.name == "postgresql" else ""))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS cairn_audit_append_only()")
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_log_user_name'))
        batch_op.drop_index('ix_audit_log_time')

    op.drop_table('audit_log')
