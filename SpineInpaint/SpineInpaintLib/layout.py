"""Compare layout: input | sample 1..K (or input | weighted | masked | RePaint) in linked slice views centred on the
landmark.

``compareLayoutXml`` and ``assignVolumesToViews`` are pure MRML (testable headless); ``showCompareLayout`` needs the
Slicer GUI (``slicer.app``) to switch the layout and is a no-op without it.
"""
from __future__ import annotations

from typing import Optional, Sequence
from xml.sax.saxutils import escape

COMPARE_LAYOUT_ID = 56010  # custom layout id (any unused integer > 500)
VIEW_PREFIX = "SpineInpaint"
MAX_PER_ROW = 4
VIEW_COLORS = ("#8C8C8C", "#E17012", "#D9B13B", "#5E8A3D", "#3D6A8A", "#8A3D7E", "#3D8A84", "#A33B3B")


def viewNames(count: int) -> list[str]:
    return [f"{VIEW_PREFIX}{i}" for i in range(count)]


def compareLayoutXml(count: int, orientation: str = "Sagittal", labels: Optional[Sequence[str]] = None) -> str:
    """Slicer layout description: ``count`` slice views, at most 4 per row (rows stacked vertically)."""
    if count < 1:
        raise ValueError("the compare layout needs at least one view")
    labels = list(labels or [])
    names = viewNames(count)
    rows = [names[i:i + MAX_PER_ROW] for i in range(0, count, MAX_PER_ROW)]
    out = ['<layout type="vertical">']
    for row in rows:
        out.append(' <item>')
        out.append('  <layout type="horizontal">')
        for name in row:
            i = names.index(name)
            label = labels[i] if i < len(labels) else ("In" if i == 0 else str(i))
            out.append('   <item>')
            out.append(f'    <view class="vtkMRMLSliceNode" singletontag="{name}">')
            out.append(f'     <property name="orientation" action="default">{escape(orientation)}</property>')
            out.append(f'     <property name="viewlabel" action="default">{escape(label)}</property>')
            out.append(f'     <property name="viewcolor" action="default">{VIEW_COLORS[i % len(VIEW_COLORS)]}</property>')
            out.append('     <property name="viewgroup" action="default">0</property>')
            out.append('    </view>')
            out.append('   </item>')
        out.append('  </layout>')
        out.append(' </item>')
    out.append('</layout>')
    return "\n".join(out)


def _nodesByLayoutName(scene, className: str) -> dict:
    out = {}
    for i in range(scene.GetNumberOfNodesByClass(className)):
        node = scene.GetNthNodeByClass(i, className)
        out[node.GetLayoutName()] = node
    return out


def assignVolumesToViews(scene, volumeNodes: Sequence, landmarkRas: Optional[Sequence[float]] = None,
                         link: bool = True) -> int:
    """Show volume i as background of view ``SpineInpaint<i>``, link the views, centre them on the landmark.

    Returns the number of views that were set up (views not present in the scene are skipped).
    """
    composites = _nodesByLayoutName(scene, "vtkMRMLSliceCompositeNode")
    slices = _nodesByLayoutName(scene, "vtkMRMLSliceNode")
    done = 0
    for name, volume in zip(viewNames(len(volumeNodes)), volumeNodes):
        composite, sliceNode = composites.get(name), slices.get(name)
        if composite is None or sliceNode is None:
            continue
        composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
        composite.SetForegroundVolumeID(None)
        composite.SetLabelVolumeID(None)
        composite.SetLinkedControl(bool(link))
        if volume is not None and hasattr(sliceNode, "RotateToVolumePlane"):
            sliceNode.RotateToVolumePlane(volumeNodes[0])  # oblique scans: slice along the input's own axes
        if landmarkRas is not None:
            sliceNode.JumpSliceByCentering(*[float(v) for v in landmarkRas])
        done += 1
    return done


def showCompareLayout(volumeNodes: Sequence, landmarkRas: Optional[Sequence[float]] = None,
                      labels: Optional[Sequence[str]] = None) -> bool:
    """Switch the GUI to the compare layout (False without the Slicer GUI)."""
    import slicer

    if not hasattr(slicer, "app") or slicer.app.layoutManager() is None:
        return False
    layoutManager = slicer.app.layoutManager()
    layoutNode = layoutManager.layoutLogic().GetLayoutNode()
    xml = compareLayoutXml(len(volumeNodes), labels=labels)
    if layoutNode.IsLayoutDescription(COMPARE_LAYOUT_ID):
        layoutNode.SetLayoutDescription(COMPARE_LAYOUT_ID, xml)
    else:
        layoutNode.AddLayoutDescription(COMPARE_LAYOUT_ID, xml)
    layoutManager.setLayout(COMPARE_LAYOUT_ID)
    slicer.app.processEvents()
    assignVolumesToViews(slicer.mrmlScene, volumeNodes, landmarkRas)
    for name in viewNames(len(volumeNodes)):
        widget = layoutManager.sliceWidget(name)
        if widget is None:
            continue
        widget.sliceLogic().FitSliceToAll()  # zoom to the volume, then re-centre on the landmark
        if landmarkRas is not None:
            widget.mrmlSliceNode().JumpSliceByCentering(*[float(v) for v in landmarkRas])
    return True
