"""routers, router interfaces, floating IPs, external addresses

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 05:00:00
"""

from typing import Any

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def _resource_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column('project_id', sa.String(length=36), nullable=False),
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=63), nullable=False),
        sa.Column('spec', sa.JSON(), nullable=False),
        sa.Column('status', sa.JSON(), nullable=False),
        sa.Column('generation', sa.Integer(), nullable=False),
        sa.Column('observed_generation', sa.Integer(), nullable=False),
        sa.Column('conditions', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table('routers',
    sa.Column('external_address', sa.String(length=64), nullable=True),
    *_resource_columns(),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'name', name='uq_routers_name')
    )
    with op.batch_alter_table('routers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_routers_project_id'), ['project_id'], unique=False)

    op.create_table('router_interfaces',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('router_id', sa.String(length=36), nullable=False),
    sa.Column('subnet_id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['router_id'], ['routers.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['subnet_id'], ['subnets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('subnet_id', name='uq_router_interfaces_subnet')
    )
    with op.batch_alter_table('router_interfaces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_router_interfaces_router_id'), ['router_id'], unique=False)

    op.create_table('floating_ips',
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('port_id', sa.String(length=36), nullable=True),
    sa.Column('router_id', sa.String(length=36), nullable=True),
    sa.Column('fixed_address', sa.String(length=64), nullable=True),
    *_resource_columns(),
    sa.ForeignKeyConstraint(['port_id'], ['ports.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['router_id'], ['routers.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'name', name='uq_floating_ips_name')
    )
    with op.batch_alter_table('floating_ips', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_floating_ips_port_id'), ['port_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_floating_ips_project_id'), ['project_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_floating_ips_router_id'), ['router_id'], unique=False)

    op.create_table('external_addresses',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('router_id', sa.String(length=36), nullable=True),
    sa.Column('floating_ip_id', sa.String(length=36), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['floating_ip_id'], ['floating_ips.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['router_id'], ['routers.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('address', name='uq_external_addresses_address')
    )
    with op.batch_alter_table('external_addresses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_external_addresses_floating_ip_id'), ['floating_ip_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_external_addresses_router_id'), ['router_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('external_addresses', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_external_addresses_router_id'))
        batch_op.drop_index(batch_op.f('ix_external_addresses_floating_ip_id'))
    op.drop_table('external_addresses')
    with op.batch_alter_table('floating_ips', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_floating_ips_router_id'))
        batch_op.drop_index(batch_op.f('ix_floating_ips_project_id'))
        batch_op.drop_index(batch_op.f('ix_floating_ips_port_id'))
    op.drop_table('floating_ips')
    with op.batch_alter_table('router_interfaces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_router_interfaces_router_id'))
    op.drop_table('router_interfaces')
    with op.batch_alter_table('routers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_routers_project_id'))
    op.drop_table('routers')
