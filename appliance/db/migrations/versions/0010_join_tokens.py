"""join tokens

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 14:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None
compatible_with = '0009'  # additive: code of 0009 runs on it


def upgrade() -> None:
    op.create_table('join_tokens',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('used_by', sa.String(length=63), nullable=True),
    sa.Column('created_by', sa.String(length=63), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('join_tokens')
