"""member versions: each node records its code version and the schema its code carries;
the database records the oldest code schema that can run on it (rolling upgrades)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 09:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None
# Additive (nullable columns, a new table): code that carries schema 0008 runs on it.
compatible_with = '0008'


def upgrade() -> None:
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('code_version', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('schema_version', sa.String(length=32), nullable=True))
    op.create_table('schema_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.String(length=32), nullable=False),
    sa.Column('compatible_with', sa.String(length=32), nullable=False),
    sa.Column('migrated_by', sa.String(length=255), nullable=True),
    sa.Column('migrated_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('schema_state')
    with op.batch_alter_table('nodes', schema=None) as batch_op:
        batch_op.drop_column('schema_version')
        batch_op.drop_column('code_version')
